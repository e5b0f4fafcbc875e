"""Compression methods: each wraps or edits a backbone's block list, none forks the model."""
