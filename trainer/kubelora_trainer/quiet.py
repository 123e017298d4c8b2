"""Keep library chatter out of the training log; nothing is ever fetched from a model hub."""
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Our loss reads the transformer's output out of place, the case this FSDP2 warning is not about.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the demo's in-process S3 server


def quiet_progress_bars() -> None:
    """diffusers' pipeline loading bars (call once diffusers is importable)."""
    try:
        from diffusers.utils import logging as dlog
        dlog.disable_progress_bar()
    except ImportError:
        pass
