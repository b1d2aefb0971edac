"""Training the trained scorers (scorers/) on the frozen bundled model, offline on CPU."""
