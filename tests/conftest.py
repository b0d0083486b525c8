import os
import sys

# Multi-rank tests spawn processes; keep each to one intra-op thread so two
# cores are not oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
