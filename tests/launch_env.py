"""What every fresh-launch test gives its child processes: a free port and an environment without this pytest
process's rendezvous variables (an in-process run earlier in the session may have left them, with its store still
listening on MASTER_PORT), on CPU, offline and quiet."""
from __future__ import annotations

import os
import socket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
               "TORCHELASTIC_USE_AGENT_STORE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(root: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(root, "hf_datasets"), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env
