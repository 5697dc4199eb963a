"""Tasks: what a sample asks, how a reply is scored (shared by data, training and evaluation)."""
