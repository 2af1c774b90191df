module tsnet2.invalid/cluster-tools/pause

go 1.24
