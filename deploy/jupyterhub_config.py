"""JupyterHub for a class: every user gets a server of their own that opens the explorer under Voilà.

    jupyterhub -f deploy/jupyterhub_config.py            # from the repository root, in its environment

What the class gets (docs/deploying.md, "A class on JupyterHub", says how to run and size it):
- each user's default URL is the explorer (`/user/<name>/voila/render/explorer.ipynb`), optionally in a
  starting state: GPTQ_EXPLORER_HUB_QUERY="bits=3&col=200" (any app link's query, docs/app.md "Links");
- one BLAS thread per kernel and no local model folders, as `./run.sh app` has;
- memory and CPU limits for spawners that enforce them (containers, systemd), from the measured size of
  a visitor's kernel;
- GPTQ_EXPLORER_HUB_SPAWNER=simple with GPTQ_EXPLORER_HUB_AUTH=dummy: every user a process of the hub's
  own Unix user, any name and password let in. For a trial on one machine and for tests/test_deploy_hub.py
  only; never on a network others can reach.
Anything else (the spawner and authenticator of a real class) is set below the marked line or in a
second config file loaded after this one.
"""

import os
import shutil
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
env = os.environ.get

# -- the hub: loopback unless told otherwise; its database and cookie secret in a folder of its own
c.JupyterHub.ip = env("GPTQ_EXPLORER_HUB_IP", "127.0.0.1")
c.JupyterHub.port = int(env("GPTQ_EXPLORER_HUB_PORT", "8000"))
c.JupyterHub.hub_port = int(env("GPTQ_EXPLORER_HUB_API_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('GPTQ_EXPLORER_HUB_PROXY_API_PORT', '8001')}"
state = Path(env("GPTQ_EXPLORER_HUB_STATE", str(ROOT / ".hub")))
state.mkdir(parents=True, exist_ok=True)
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
# configurable-http-proxy (npm): on PATH, or where ./run.sh test installs it
proxy = env("GPTQ_EXPLORER_HUB_PROXY") or shutil.which("configurable-http-proxy")
if proxy:
    c.ConfigurableHTTPProxy.command = [proxy]

# -- each user's server: the explorer under Voilà
query = env("GPTQ_EXPLORER_HUB_QUERY", "").lstrip("?")
c.Spawner.default_url = "/voila/render/explorer.ipynb" + (f"?{query}" if query else "")
c.Spawner.notebook_dir = str(NOTEBOOKS)
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]  # this environment's, whatever PATH says
c.Spawner.environment = {
    "OMP_NUM_THREADS": "1",
    "GPTQ_EXPLORER_THREADS": "1",
    "GPTQ_EXPLORER_LOCAL": "0",
    "GPTQ_EXPLORER_MAX_MODEL_GB": "3",
}
# A visitor's kernel holds about 0.7 GB once the default SmolLM2 layer is loaded (docs/deploying.md), the
# user's Jupyter server about 0.1 GB; the Model Lab quantizes a whole copy of the model (about 1 GB more).
c.Spawner.mem_limit = env("GPTQ_EXPLORER_HUB_MEM", "2G")
c.Spawner.cpu_limit = float(env("GPTQ_EXPLORER_HUB_CPU", "1"))
c.Spawner.start_timeout = 120  # a server's first start on a busy machine imports a lot
c.Spawner.http_timeout = 120

# -- a trial on one machine (and the test): local processes, any name let in
if env("GPTQ_EXPLORER_HUB_SPAWNER") == "simple":
    c.JupyterHub.spawner_class = "simple"
    c.SimpleLocalProcessSpawner.home_dir_template = str(state / "home" / "{username}")
    if os.geteuid() == 0:  # containers often run as root; Jupyter refuses that unless told
        c.Spawner.args = ["--ServerApp.allow_root=True"]
if env("GPTQ_EXPLORER_HUB_AUTH") == "dummy":
    c.JupyterHub.authenticator_class = "dummy"
    c.Authenticator.allow_all = True

# ---- a real class: the spawner and authenticator go here (docs/deploying.md has a DockerSpawner example)
