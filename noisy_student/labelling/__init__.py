"""The human in the loop: the queue of unlabelled images worth labelling next (and its
files for Label Studio), and the annotators' labels taken back into the dataset."""
