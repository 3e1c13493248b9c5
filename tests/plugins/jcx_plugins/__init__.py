"""An outside package of jcompress methods, for the plugin tests: nothing in it is
part of jcompress. ``pow2`` has a codec, ``shrink`` has none."""
