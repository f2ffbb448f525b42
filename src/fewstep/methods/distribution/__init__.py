"""Distribution matching: one-step and few-step generators trained against a fake score of their own samples."""
