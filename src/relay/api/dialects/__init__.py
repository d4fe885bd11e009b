"""One module per foreign API shape, each only translating to and from Submission."""
