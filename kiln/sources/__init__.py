"""Sources: from a name to a loadable kiln folder (local paths, hub ids, the default model)
and the store where converted models are kept."""
