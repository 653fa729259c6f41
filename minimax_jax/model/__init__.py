"""The model wing: parameter layout, layers, decoder, caches and run options."""
