"""Foreign API shapes, one module each, every one only translating to and from `Submission`."""
