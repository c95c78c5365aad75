"""rewardscope service layer: HTTP service, CLI, image decoding and folder scoring.
Knows the Scorer's interface and nothing of model internals."""
