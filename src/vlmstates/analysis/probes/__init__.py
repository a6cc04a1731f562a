"""The probes: their settings, training and statistics, plots, and the saved form that `screen` reads."""
