"""The distillation trainer: ``train(config)`` on DeepSpeed ZeRO (see :mod:`.loop`), its config schema
(:mod:`.config`), checkpoints (:mod:`.checkpoint`) and the teacher-cache writer entry point."""
from .config import Config, load_config
from .loop import train

__all__ = ["train", "Config", "load_config", "cache_teacher"]


def cache_teacher(config, overrides=None, out_dir=None):
    from .cache_writer import cache_teacher as _ct

    return _ct(config, overrides, out_dir)
