"""Native backends. Each module exposes ``available()``, ``info()`` and ``OPS``: op name -> compute(canonical args)."""
