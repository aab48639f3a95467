"""Inference across the cluster: collaborative edge→cloud inference (joint cascade, split
computing) over a measured link."""
