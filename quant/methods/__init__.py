"""The methods: each module composes the substrate (quant/*.py) and registers a handler with quant.api."""
