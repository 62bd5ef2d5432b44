"""The 2-D toy of Fig. 1 of the BLAQ paper (LAQ vs BLAQ with 1-bit weights)."""
