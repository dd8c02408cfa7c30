"""Scoring models the way parameter-golf does: bits per byte, sliding windows, a Hedge mixer, score-first TTT."""
from __future__ import annotations

from .bpb import ByteLUTs, Score, bits_per_byte, score, target_bytes
from .mixer import MixerConfig, mix_nll
from .sliding import Window, plan_windows, sliding_nll
from .ttt import TTTConfig, ttt_nll

__all__ = ["ByteLUTs", "MixerConfig", "Score", "TTTConfig", "Window", "bits_per_byte", "mix_nll", "plan_windows",
           "score", "sliding_nll", "target_bytes", "ttt_nll", "evaluate"]


def evaluate(model_path, data_dir, **kwargs):
    """Score a .qpk artifact or checkpoint on a data directory's val split (see qpack.eval.run.evaluate)."""
    from .run import evaluate as _evaluate

    return _evaluate(model_path, data_dir, **kwargs)
