"""What training and serving share: networks, vocabulary layout, item trie, beam search, bundle."""
