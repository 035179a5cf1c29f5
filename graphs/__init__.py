"""greylens.graphs: co-activation statistics, the adaptive sparse GNN autoencoder, feature graphs,
reasoning paths and feature-dataset export. Not built yet: see the open issues."""
