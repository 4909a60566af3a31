"""Training: the one loop, what a step keeps for its backward, the packed data, and the stages as functions."""
