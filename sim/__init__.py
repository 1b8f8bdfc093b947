"""A simulated TGI server and the simulated GPU under it, for the demo, tests and what-if runs."""
