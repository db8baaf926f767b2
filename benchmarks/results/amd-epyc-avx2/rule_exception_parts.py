"""Run as `python benchmarks/results/amd-epyc-avx2/rule_exception_parts.py OUT.json`. Per-part timings (flaxcnn.tune.time_part, best of rounds) of the rule exceptions' layers."""
import json, sys
from flaxcnn.models.conv_policy import ConvLayer, DepthwiseLayer
from flaxcnn.tune import time_part
from flaxcnn.models.conv_policy import ConvPolicy
isa = ConvPolicy().kernel_isa()
P1 = ((1, 1), (1, 1))
convs = [ConvLayer(64, 2, 2, (3, 3, 512, 512), P1, None, isa),
         ConvLayer(64, 4, 4, (3, 3, 256, 256), P1, None, isa),
         ConvLayer(64, 8, 8, (3, 3, 128, 128), P1, None, isa),
         ConvLayer(64, 16, 16, (3, 3, 64, 128), P1, None, isa)]
dws = [DepthwiseLayer(64, 16, 16, 144, 1, (3, 3), (1, 1), P1, (1, 1), None),
       DepthwiseLayer(64, 16, 16, 144, 1, (3, 3), (2, 2), P1, (1, 1), None),
       DepthwiseLayer(64, 4, 4, 960, 1, (3, 3), (1, 1), P1, (1, 1), None),
       DepthwiseLayer(64, 8, 8, 240, 1, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), None)]
out = []
for layer in convs:
    for part in ("forward", "kernel_grad", "input_grad"):
        ms = {k: round(v * 1e3, 2) for k, v in time_part(layer, part).items()}
        out.append({"layer": layer.key(), "part": part, "ms": ms}); print(out[-1], flush=True)
for layer in dws:
    ms = {k: round(v * 1e3, 2) for k, v in time_part(layer, "depthwise").items()}
    out.append({"layer": layer.key(), "part": "depthwise", "ms": ms}); print(out[-1], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
