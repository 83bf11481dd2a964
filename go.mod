module github.com/podipc/podipc

go 1.26
