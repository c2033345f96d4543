module aihow.dev/bench/tcgcrypto

go 1.24
