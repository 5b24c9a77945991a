"""The ``trtrefit`` CLI's help texts (descriptions and epilogs with examples), kept apart from the
parser so that ``refitcore.cli.main`` reads as code."""
from __future__ import annotations

__all__ = ["MAIN_HELP", "MAIN_EPILOG", "COMPILE_EPILOG", "GATE_EPILOG", "AUDIT_EPILOG", "DOCTOR_FLAGS"]

MAIN_HELP = """\
Prove a TensorRT weight refit right before you ship it.

A refittable engine is compiled once from a model factory; each new checkpoint is then
refitted into a copy of it, through the cached weight map (fast) and/or the fallback
(convert again, read the weights back), and the refitted engine is compared with eager
PyTorch on sample inputs.
"""

MAIN_EPILOG = """\
examples:
  # compile once (the factory is recorded in the bundle, so later steps can rebuild the model)
  trtrefit compile torchvision.models:resnet18 --input 1x3x224x224 -o resnet18.trtrefit

  # CI gate: refuse a checkpoint whose refit does not reproduce eager PyTorch
  trtrefit gate resnet18.trtrefit finetuned.pt --inputs random:4 --model torchvision.models:resnet18 \
      --markdown summary.md

  # do two engines hold the same weights? does an engine hold this checkpoint?
  trtrefit audit before.trtrefit after.trtrefit
  trtrefit audit resnet18.trtrefit finetuned.pt

  # what can this machine do (GPU, TensorRT, backends)?
  trtrefit doctor

exit codes: 0 pass, 1 mismatch (names the weight), 2 unusable input (missing or damaged
file, other architecture: recompile needed).
"""

COMPILE_EPILOG = """\
MODULE:FACTORY names a callable that returns the model (an nn.Module), e.g.
torchvision.models:resnet18 or mypkg.models:build_classifier. It is recorded in the bundle;
`trtrefit gate --trust-factory` imports it to rebuild the eager model and to re-export for the
fallback path (without that flag, pass --model).

examples:
  trtrefit compile torchvision.models:resnet18 --input 1x3x224x224 -o resnet18.trtrefit
  trtrefit compile mypkg.models:build --input 1x3x64x64 --checkpoint base.pt --backend reference -o m.trtrefit
  trtrefit compile mypkg.models:two_inputs --input 1x3x32x32 --input 1x10 -o m.trtrefit
  trtrefit compile torchvision.models:resnet18 --input 1-4-8x3x224x224 -o r18.trtrefit  # batch 1..8, tuned for 4

--backend auto uses TensorRT when a usable GPU engine can be built and run here, else the
reference backend (a CPU interpreter of the same TensorRT network: it checks the network and
the weight mapping, not TensorRT's kernels), and says which it picked.
"""

GATE_EPILOG = """\
SAMPLES, the inputs the refitted engine and eager PyTorch are compared on:
  random:N[:SEED]   N random normal inputs of the engine's input shape(s) (seed 0 by default);
                    for an engine compiled with shape ranges: its min, opt and max shapes, then N
                    shapes drawn inside the ranges (a file's samples may have any shape inside them)
  FILE.pt           torch.save'd tensors, read with torch.load(weights_only=True): one tensor of
                    the input shape (one sample), a tensor with one more leading dimension (one
                    sample per entry), or a list of samples (each a tensor, or a list of tensors
                    for a model with several inputs)
  FILE.npy          a NumPy array, as for one tensor above (read without pickle)

checks, in order: the files are readable; the checkpoint fits the compiled architecture; no
NaN/Inf weight; each chosen path refits a copy of the engine and matches eager PyTorch on
every sample (max abs error <= atol * max(1, max|eager|) + rtol * |eager|); with both paths,
the cached and fallback mappings agree weight by weight. A failure names the culprit weight.

examples:
  trtrefit gate resnet18.trtrefit finetuned.pt --inputs random:4 --model torchvision.models:resnet18
  trtrefit gate m.trtrefit ckpt.pt --inputs samples.pt --paths cached --rtol 1e-3 --atol 1e-3 --trust-factory
  trtrefit gate m.trtrefit ckpt.pt --inputs random:8:123 --trust-factory --report gate.json \
      --markdown "$GITHUB_STEP_SUMMARY"
  trtrefit gate m.trtrefit ckpt.pt --inputs random:2 --model mypkg.models:build
  trtrefit gate m.trtrefit ckpt.pt --inputs random:2 --trust-factory   # import the factory the bundle names

the eager model comes from --model; a bundle only RECORDS its factory (a file is data): it is imported
only with --trust-factory.

exit codes: 0 every check passed; 1 a mismatch or a refused weight (NaN/Inf, overflow); 2 unusable
input (missing file, damaged bundle, checkpoint of another architecture: recompile needed).
"""

AUDIT_EPILOG = """\
A and B are engine bundles (.trtrefit) or checkpoints; at least one must be a bundle.
  bundle vs bundle:      their current weights, weight by weight
  bundle vs checkpoint:  the checkpoint mapped through the bundle's weight map (the cached path)
                         vs the weights the bundle holds: "was this engine refitted with this?"

examples:
  trtrefit audit before.trtrefit after.trtrefit
  trtrefit audit deployed.trtrefit finetuned.pt --report audit.json

exit codes: 0 the weights agree; 1 they disagree (the report leads with the worst weight);
2 unusable input.
"""

# ``trtrefit doctor``'s flags: one table, used by refitcore.cli.doctor's own parser and by the
# ``trtrefit doctor`` subcommand (so ``trtrefit doctor --help`` lists every flag).
DOCTOR_FLAGS = (
    ("--json", "print the checks as JSON: item, value, reason, status (ok, FAIL, n/a, info) (default: text)"),
    ("--require-tensorrt", "exit with status 1 unless the TensorRT backend can build, run and refit here; on a "
                           "machine without a CUDA GPU the TensorRT lines are n/a, and this flag still exits 1 "
                           "(default: exit 0 whatever the checks say)"),
)
