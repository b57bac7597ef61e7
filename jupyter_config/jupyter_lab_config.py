# Settings for `make lab` (jupyter lab --config=jupyter_config/jupyter_lab_config.py): the notebooks folder,
# loopback only, no news, the notebook's own kernel started without a "Select Kernel" dialog. Widgets
# (ipywidgets, anywidget for plotly's FigureWidget) and plotly figures render through the lab extensions that
# their Python packages install into the environment; nothing here needs the network.
import os

c = get_config()  # noqa: F821

here = os.path.dirname(os.path.abspath(__file__))
c.ServerApp.ip = "127.0.0.1"  # loopback only
c.ServerApp.open_browser = False
c.ServerApp.allow_root = True  # containers often run as root; the server is bound to loopback only
c.ServerApp.root_dir = os.path.join(os.path.dirname(here), "notebooks")
c.LabApp.news_url = None  # no news fetching (and no network here anyway)
c.LabServerApp.extra_labextensions_path = []
# JupyterLab reads default settings from <config dir>/labconfig/default_setting_overrides.json on every config
# path; putting this folder on the path applies ours (fetchNews off, autoStartDefaultKernel on). Users' own
# settings still win over these defaults.
os.environ["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
    p for p in (here, os.environ.get("JUPYTER_CONFIG_PATH")) if p
)
