"""Where the replacement model's KL comes from: the KL to the original model with groups of layers error-corrected.

For each group of layers, the replacement model runs with the CLT's reconstruction error (measured on the original
run) added back at those layers only, so they write exactly what the model's MLPs wrote; the drop from the plain
replacement's KL is what that group's errors cost. One batch of the corpus's held-out sequences (BOS excluded, as
``cltlab.evaluate`` does). The README's "Quality per CPU-minute" quotes it for the default run's CLT.
Usage: python benchmarks/kl_by_layer.py [--clt runs/default/clt] [--groups 0-1,0-9,10-19,20-29] [--sequences 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import cltlab
from cltlab.corpus import token_sequences


def kl_to(original: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(original ‖ logits) over the positions after BOS."""
    p, q = F.log_softmax(original.float(), -1), F.log_softmax(logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)[:, 1:].mean().item()


def parse_group(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clt", default="runs/default/clt", help="A saved CLT folder.")
    parser.add_argument(
        "--profile", default="default", help="The profile whose model and corpus it was trained on."
    )
    parser.add_argument(
        "--groups", default="0,1,0-1,0-9,10-19,20-29,29", help="Comma-separated layers or a-b ranges."
    )
    parser.add_argument("--sequences", type=int, default=8, help="Held-out sequences (one batch).")
    args = parser.parse_args()
    profile = cltlab.config.get_profile(args.profile)
    model = cltlab.load_model(profile.harvest.model)  # float32, as notebook 04 evaluates
    clt = cltlab.CrossLayerTranscoder.load(args.clt)
    replacement = cltlab.ReplacementModel(model, clt)
    batches = token_sequences(
        profile.harvest.corpus,
        model.tokenizer,
        seq_len=profile.harvest.seq_len,
        bos_token_id=model.bos_token_id,
        split="eval",
        batch_size=args.sequences,
    )
    ids = next(iter(batches))
    original = replacement.logits(ids, mode="original")
    errors = replacement.reconstruction_errors(ids)  # (batch, seq, n_layers, d_model)
    plain = kl_to(original, replacement.logits(ids))
    print(f"replacement KL = {plain:.3f}")
    for text in args.groups.split(","):
        layers = [layer - clt.config.layer_offset for layer in parse_group(text)]
        corrected = torch.zeros_like(errors)
        corrected[:, :, layers] = errors[:, :, layers]
        kl = kl_to(original, replacement.logits(ids, errors=corrected))
        print(f"kl_fixed_{text.replace('-', '_')} = {kl:.3f}  (layers {text} error-corrected)")


if __name__ == "__main__":
    main()
