"""Building a medium: boot each flavour, save it, compress, checksum, write the manifest."""
