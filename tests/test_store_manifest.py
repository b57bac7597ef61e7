"""The manifest under concurrent jobs: always valid JSON, never a stale ``complete=False``, no temp files left."""

from __future__ import annotations

import json
import multiprocessing
import time

from test_store import make_shard, provenance

import cltlab.store
from cltlab.store import MANIFEST, shard_name, write_manifest

N_JOBS = 4


def finish_shard_and_list(directory, index: int, barrier) -> None:
    """One job's ending: rename its shard into place, then write the manifest (a few times, slowly)."""
    open_shard = cltlab.store.open_shard

    def slow_open_shard(*args, **kwargs):  # widen the time between listing the shards and writing the file
        time.sleep(0.01)
        return open_shard(*args, **kwargs)

    cltlab.store.open_shard = slow_open_shard
    barrier.wait()
    write_manifest(directory, provenance(), N_JOBS)
    (directory / (shard_name(index) + ".partial")).rename(directory / shard_name(index))
    for _ in range(3):
        write_manifest(directory, provenance(), N_JOBS)


def test_jobs_writing_the_manifest_at_once_leave_it_valid_and_complete(tmp_path):
    for index in range(N_JOBS):
        make_shard(tmp_path, index, 12, partial=True)[1].close()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(N_JOBS)
    jobs = [context.Process(target=finish_shard_and_list, args=(tmp_path, i, barrier)) for i in range(N_JOBS)]
    for job in jobs:
        job.start()
    seen = 0
    while any(job.is_alive() for job in jobs):
        if (tmp_path / MANIFEST).exists():
            json.loads((tmp_path / MANIFEST).read_text())  # readers never see a mixed file
            seen += 1
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0] * N_JOBS
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["n_written"] == 12 * N_JOBS
    assert [s["file"] for s in manifest["shards"]] == [shard_name(i) for i in range(N_JOBS)]
    # No temporary file or lock is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, *(shard_name(i) for i in range(N_JOBS))]
    assert seen > 0
