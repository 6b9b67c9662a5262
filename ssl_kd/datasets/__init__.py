"""Built-in datasets turned into labeled / unlabeled / test shards."""
