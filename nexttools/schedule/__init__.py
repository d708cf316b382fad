"""Jumping while the run trains: a jump applied to the live model (:mod:`nexttools.schedule.live`)
and the Trainer callback that repeats it (:mod:`nexttools.schedule.callback`, which needs
transformers). The jumps' record is :mod:`nexttools.jump_record`."""

from nexttools.schedule.live import LiveJump, jump_live

__all__ = ["LiveJump", "jump_live"]
