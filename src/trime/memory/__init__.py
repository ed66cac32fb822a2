"""Memory: the joint softmax over token embeddings and memory entries, masks, caches, datastores."""
