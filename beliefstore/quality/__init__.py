"""Belief quality: a simulated world with ground truth, baseline merges, scores
(accuracy, Brier, ECE, handoff repeat questions) and trust calibration from outcomes.

Modules: :mod:`.world` (the seeded world), :mod:`.baselines` (last write wins, highest
confidence, majority vote, mean confidence, and the fold as a method), :mod:`.metrics`,
:mod:`.evaluate` (runs methods over a world), :mod:`.oracle` (methods that know the world's
hidden parameters: bounds on what any merge can reach) and :mod:`.calibrate` (fits each
source's trust from outcomes). Pure and importable; no I/O except the explicit load functions.
"""
