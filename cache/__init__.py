"""Step caching policies (TeaCache, TaylorSeer) and the block hook."""
