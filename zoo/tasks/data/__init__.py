"""LightningDataModules. Each owns its data; tasks pick one through the ``data=`` config group."""
