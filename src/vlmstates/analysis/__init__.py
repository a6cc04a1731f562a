"""Label, probe, screen and compare: hallucination labels of the answers, the HALP probes trained on the
vectors, saved probes screening new questions, and the summary across models."""
