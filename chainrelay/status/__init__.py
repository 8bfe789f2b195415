"""The status page of the admin listener: ``/status`` (one static HTML file) over
``/status.json`` (this node's state and its last minutes, sampled once a second)."""
