"""Lightning plumbing: run Lightning Trainers on cai_labs ranks, and a ZeRO strategy."""
