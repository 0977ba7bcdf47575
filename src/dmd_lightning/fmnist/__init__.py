"""Fashion-MNIST, the embedded default: data, the teacher's training, the FID classifier and the teacher check."""
