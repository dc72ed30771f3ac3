"""Converters from other libraries' weights to vitkit's: pure functions, one module per source format.

`vitkit.convert` may import from `vitkit.models`; `vitkit.models` never imports from here.
"""
