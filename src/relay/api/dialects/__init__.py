"""Foreign API shapes, one module each, each only translating to and from `Submission`."""
