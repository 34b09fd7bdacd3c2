"""Running many clients on one workstation through Flower's Ray backend."""
