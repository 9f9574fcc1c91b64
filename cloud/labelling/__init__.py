"""The labelling tasks: selective manual labelling (Label Studio/CSV hand-off, simulated labeller)
and automated client labelling (the cloud's side of the devices' private kNN vote). docs/tasks.md."""
