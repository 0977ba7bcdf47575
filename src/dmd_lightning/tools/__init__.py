"""Tools around the method: the demo (`make demo`) and the speed and memory bench (`make bench`)."""
