"""Client libraries: block and batch subscribers and the batch publisher. They speak to a
node over its public endpoints and import none of the server's modules."""
