"""Pure-torch references written from the papers' math (float64-capable, slow, easy to read).

They are the baselines of the benchmark and a second opinion in the tests; the independent oracles
(torch's F.cross_entropy, POT, gudhi, ...) are the first.
"""
