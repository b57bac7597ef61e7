# Settings for `make lab` (jupyter lab --config=jupyter_config/jupyter_lab_config.py).
import os

c = get_config()  # noqa: F821

here = os.path.dirname(os.path.abspath(__file__))
c.ServerApp.ip = "127.0.0.1"  # loopback only
c.ServerApp.open_browser = False
c.ServerApp.root_dir = os.path.join(os.path.dirname(here), "notebooks")
c.LabApp.news_url = None  # no news fetching (and no network here anyway)
c.LabServerApp.extra_labextensions_path = []
