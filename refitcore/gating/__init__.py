"""The pre-deploy gate: a bundle, a checkpoint and samples in, a report and an exit code out."""
